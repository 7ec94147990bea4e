"""magseg's command line (installed as ``magseg.cli``; the console command is ``magseg``)."""
