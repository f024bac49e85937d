"""JUnit XML for CI systems: one test case per (probe, output) comparison."""

from __future__ import annotations

import xml.etree.ElementTree as ET


def write_junit(path: str, suite: str, checks, seconds: float) -> None:
    failures = [c for c in checks if not c.passed]
    root = ET.Element("testsuites")
    ts = ET.SubElement(root, "testsuite", name=suite, tests=str(len(checks)), failures=str(len(failures)),
                       errors="0", time=f"{seconds:.3f}")
    for c in checks:
        case = ET.SubElement(ts, "testcase", classname=suite, name=f"{c.probe}.{c.output}", time="0")
        case.set("rel_l2", f"{c.rel_l2:.6g}")
        if not c.passed:
            fail = ET.SubElement(case, "failure", message=c.reason)
            fail.text = f"rel_l2={c.rel_l2:.6g} max_abs={c.max_abs:.6g} cosine={c.cosine:.6f}"
    ET.indent(root)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
