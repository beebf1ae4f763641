"""`python -m proxy.cli ...`: the same as the `llm-gateway` script."""
import sys

from proxy.cli.main import main

sys.exit(main())
