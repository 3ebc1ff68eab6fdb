from stream.cli import main

main(prog_name="promo")
