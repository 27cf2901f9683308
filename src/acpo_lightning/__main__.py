from acpo_lightning.cli import main

main()
