"""The contract both sides import: configuration, fragments, message layouts and errors."""
