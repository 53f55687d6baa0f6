import sys

from tandem_api.bench.cli import main

sys.exit(main())
