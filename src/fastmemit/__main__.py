from fastmemit.cli import main

raise SystemExit(main())
