"""`python3 -S -m passthrough.guest`: the guest agent, PID 1 of the test guest's root (started
by vm-images/init.sh with PYTHONPATH set to the payload directory and Debian's dist-packages).
`--check` imports every payload module and exits: what tests/unit/test_guest_payload.py runs."""

import sys

if sys.argv[1:] == ["--check"]:
    from passthrough.guest.payload import import_all

    import_all()
    print("ok")
else:
    from passthrough.guest.server import main

    main()
