"""Only the optional native part; everything else is in pyproject.toml."""

from setuptools import Extension, setup

FLAGS = ["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"]

setup(ext_modules=[
    # UDP sends from a native thread (src/bootherd/udpsend.py falls back without it).
    Extension("bootherd._udpsend", ["src/bootherd/_udpsend.c"], optional=True,
              depends=["src/bootherd/_udpshared.h"], extra_compile_args=FLAGS),
    # UDP sockets drained in batches with recvmmsg (src/bootherd/udprecv.py falls back).
    Extension("bootherd._udprecv", ["src/bootherd/_udprecv.c"], optional=True,
              extra_compile_args=FLAGS),
    # TMCD's TCP connections on a native thread (src/bootherd/tmcd/front.py falls back).
    Extension("bootherd._tmcdfront", ["src/bootherd/_tmcdfront.c"], optional=True,
              extra_compile_args=FLAGS),
    # Established TFTP read transfers on a native thread (bootherd.tftp.native falls back).
    Extension("bootherd._tftpdata", ["src/bootherd/_tftpdata.c"], optional=True,
              depends=["src/bootherd/_udpshared.h"], extra_compile_args=FLAGS),
    # Repair symbols of the imaging erasure code (bootherd.imaging.fec falls back to numpy).
    Extension("bootherd._imgfec", ["src/bootherd/_imgfec.c"], optional=True,
              depends=["src/bootherd/imaging/client/gf256.h"], extra_compile_args=FLAGS),
])
