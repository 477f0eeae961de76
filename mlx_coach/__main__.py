import sys

from mlx_coach.cli import main

sys.exit(main())
