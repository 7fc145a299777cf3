"""`python -m kda_ext`: the version, what this build contains, the device found and the kernels used."""

from ._build_info import print_build_info

print_build_info()
