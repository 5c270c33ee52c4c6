from tickwave.cli import main

main()
