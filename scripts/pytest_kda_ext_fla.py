# scripts/pytest_kda_ext_fla.py: a pytest plugin that runs FLA's own tests with kda_ext registered as
# FLA's backend (`pytest -p pytest_kda_ext_fla ...` with scripts/ on PYTHONPATH), and reports, per
# FLA function, how many calls kda_ext served and why the others were declined.
"""Used by scripts/fla_upstream_tests.sh. The session fails if kda_ext served no chunk_kda call:
a green run must have exercised the backend, not FLA's own kernels."""

import collections

import kda_ext.fla

served = collections.Counter()
declined = collections.Counter()
_COUNTED = ("chunk_kda", "fused_recurrent_kda_fwd")


def pytest_configure(config):
    kda_ext.fla.register()
    for _, backend in kda_ext.fla._registrations:
        verify = backend.verify

        def counting_verify(function_name, *args, _verify=verify, **kwargs):
            accepted, reason = _verify(function_name, *args, **kwargs)
            if function_name in _COUNTED:
                if accepted:
                    served[function_name] += 1
                else:
                    declined[(function_name, reason)] += 1
            return accepted, reason
        backend.verify = counting_verify


def pytest_terminal_summary(terminalreporter):
    write = terminalreporter.write_line
    write("kda_ext as FLA's backend:")
    for name in _COUNTED:
        write(f"  {name}: served {served[name]}")
    for (name, reason), count in sorted(declined.items(), key=lambda item: -item[1]):
        write(f"  {name}: declined {count}x: {reason}")


def pytest_sessionfinish(session, exitstatus):
    if served["chunk_kda"] == 0 and session.testscollected:
        session.exitstatus = 1
        print("pytest_kda_ext_fla: kda_ext served no chunk_kda call; the run did not test the backend")
