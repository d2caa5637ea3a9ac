from vspemu.cli.main import main

main()
