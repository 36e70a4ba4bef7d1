from microsvc.cli import main

main(prog_name="microsvc")
