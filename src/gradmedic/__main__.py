"""``python -m gradmedic``: the command line."""

from gradmedic.cli.app import main

if __name__ == "__main__":
    main()
