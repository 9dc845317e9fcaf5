"""`python -m routesae ...`: the `routesae` command (and `torchrun -m routesae fit ...`)."""

from routesae.cli import main

if __name__ == "__main__":
    main()
