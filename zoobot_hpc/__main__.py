import sys

from zoobot_hpc.cli import main

sys.exit(main())
