import sys

from scalegpt.launch.cli import main

sys.exit(main())
