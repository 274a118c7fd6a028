from tbps.cli import main

raise SystemExit(main())
