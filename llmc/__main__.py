from llmc.cli import main

raise SystemExit(main())
