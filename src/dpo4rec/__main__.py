from dpo4rec.cli import main

raise SystemExit(main())
