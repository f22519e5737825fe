"""`python -m ssltrain` and `accelerate launch -m ssltrain` enter here."""

from ssltrain.cli import main

if __name__ == "__main__":
    main()
