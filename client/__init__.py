"""The site: its state directory, local distillation of the planned fragments, and the thin Flower ClientApp."""
