import sys

from fishprune.cli import main

sys.exit(main())
