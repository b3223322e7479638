"""The test guest for tests/test_guest.py: build.py packs a Debian kernel and an initramfs whose /init is init.sh."""
