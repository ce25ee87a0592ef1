from gpuforge_cli.app import main

main()
