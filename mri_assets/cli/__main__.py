import sys

from mri_assets.cli.main import main

sys.exit(main())
