from coserve.cli import main

raise SystemExit(main())
