from edgemesh.cli import main

main()
