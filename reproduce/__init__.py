"""`routesae reproduce`: the paper's experiment as one resumable command."""
