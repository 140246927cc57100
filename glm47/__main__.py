import sys

from glm47.cli.main import main

sys.exit(main())
