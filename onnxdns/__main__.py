"""``python -m onnxdns``: the command line (see :mod:`onnxdns.cli`)."""

from onnxdns.cli import main

raise SystemExit(main())
