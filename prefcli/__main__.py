# Absolute import: also works when this file is run as a script (`torchrun ... prefcli` inside a checkout
# hands torchrun the folder prefcli/, which Python runs without a package).
from prefcli.cli import main

main()
