from presence_hub.cli import main

main()
