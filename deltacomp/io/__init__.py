"""Reading and writing checkpoints, packages and the Hub."""
