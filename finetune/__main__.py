"""`python -m finetune`: see finetune.train."""

import sys

from finetune.train import main

sys.exit(main())
