from llmkit.cli.main import main

raise SystemExit(main())
