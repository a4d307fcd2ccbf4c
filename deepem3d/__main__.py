from deepem3d.cli.main import main

main()
