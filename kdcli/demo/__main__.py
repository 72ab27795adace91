"""`python -m kdcli.demo` (what `make demo` runs): the SST-2 quickstart, kdcli/demo/sst2.py."""

import sys

from kdcli.demo.sst2 import main

if __name__ == "__main__":
    sys.exit(main())
