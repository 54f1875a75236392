import sys

from bench.reproduce.main import main

sys.exit(main())
