from broker.cli.entry import main

main()
