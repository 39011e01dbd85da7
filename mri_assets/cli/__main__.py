from mri_assets.cli.main import main

main()
