"""``python -m lmcache_ext``: see `lmcache_ext.cli`."""

import sys

from lmcache_ext.cli import main

sys.exit(main())
