import sys

from aurora_sgl.trainer.loop import main

sys.exit(main())
