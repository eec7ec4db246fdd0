from fedistill.cli import app

app()
