"""microsvc.planning.system against fixture trees of /proc/self and cgroup v1/v2 files."""

from __future__ import annotations

from pathlib import Path

import pytest

from microsvc.planning.system import (
    CgroupDir,
    cgroup_dirs,
    read_cpu_quota,
    read_memory_limit,
    read_memory_measure,
    read_system_facts,
    with_app_memory,
)

V1_CPU = (
    "32 31 0:29 / /sys/fs/cgroup/cpu rw,nosuid,nodev,noexec,relatime shared:9 "
    "- cgroup cgroup rw,cpu,cpuacct"
)
V1_MEMORY = (
    "35 31 0:32 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:12 "
    "- cgroup cgroup rw,memory"
)
V2 = "41 31 0:38 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw"
V2_UNIFIED = "30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid,nodev - cgroup2 cgroup2 rw"
NOT_CGROUP = [
    "22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:5 - proc proc rw",
    "26 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw",
]
V1_NO_LIMIT = "9223372036854771712"


def make_tree(
    root: Path, cgroup: list[str], mountinfo: list[str], files: dict[str, str] | None = None
) -> Path:
    """Write proc/self/cgroup, proc/self/mountinfo and the cgroup files under `root`."""
    proc = root / "proc/self"
    proc.mkdir(parents=True)
    (proc / "cgroup").write_text("".join(line + "\n" for line in cgroup))
    (proc / "mountinfo").write_text("".join(line + "\n" for line in [*NOT_CGROUP, *mountinfo]))
    for name, text in (files or {}).items():
        path = root / name.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return root


def v2_tree(root: Path, files: dict[str, str], cgroup: str = "/x") -> Path:
    return make_tree(root, [f"0::{cgroup}"], [V2], files)


def v1_tree(root: Path, files: dict[str, str], cgroup: str = "/x") -> Path:
    return make_tree(
        root,
        [f"4:memory:{cgroup}", f"1:cpu,cpuacct:{cgroup}", f"2:name=systemd:{cgroup}"],
        [V1_CPU, V1_MEMORY],
        files,
    )


# --- cgroup v2 -------------------------------------------------------------------------


def test_v2_cpu_max_unlimited(tmp_path: Path) -> None:
    root = v2_tree(tmp_path, {"/sys/fs/cgroup/x/cpu.max": "max 100000"})
    assert read_cpu_quota(root) == (None, None)


def test_v2_cpu_max_quota(tmp_path: Path) -> None:
    root = v2_tree(tmp_path, {"/sys/fs/cgroup/x/cpu.max": "150000 100000"})
    assert read_cpu_quota(root) == (1.5, "/sys/fs/cgroup/x/cpu.max")


def test_v2_cpu_max_uses_the_period(tmp_path: Path) -> None:
    root = v2_tree(tmp_path, {"/sys/fs/cgroup/x/cpu.max": "100000 50000"})
    assert read_cpu_quota(root) == (2.0, "/sys/fs/cgroup/x/cpu.max")


def test_v2_memory_max_unlimited(tmp_path: Path) -> None:
    root = v2_tree(tmp_path, {"/sys/fs/cgroup/x/memory.max": "max"})
    assert read_memory_limit(root) == (None, None)


def test_v2_memory_max_limit(tmp_path: Path) -> None:
    root = v2_tree(tmp_path, {"/sys/fs/cgroup/x/memory.max": "536870912"})
    assert read_memory_limit(root) == (536870912, "/sys/fs/cgroup/x/memory.max")


def test_v2_cgroup_dirs(tmp_path: Path) -> None:
    root = v2_tree(tmp_path, {})
    mount = root / "sys/fs/cgroup"
    assert cgroup_dirs("cpu", root) == [CgroupDir(mount / "x", mount, 2)]
    assert cgroup_dirs("memory", root) == [CgroupDir(mount / "x", mount, 2)]


# --- cgroup v1 -------------------------------------------------------------------------


def test_v1_cfs_quota_unlimited(tmp_path: Path) -> None:
    root = v1_tree(
        tmp_path,
        {
            "/sys/fs/cgroup/cpu/x/cpu.cfs_quota_us": "-1",
            "/sys/fs/cgroup/cpu/x/cpu.cfs_period_us": "100000",
        },
    )
    assert read_cpu_quota(root) == (None, None)


def test_v1_cfs_quota(tmp_path: Path) -> None:
    root = v1_tree(
        tmp_path,
        {
            "/sys/fs/cgroup/cpu/x/cpu.cfs_quota_us": "100000",
            "/sys/fs/cgroup/cpu/x/cpu.cfs_period_us": "100000",
        },
    )
    assert read_cpu_quota(root) == (1.0, "/sys/fs/cgroup/cpu/x/cpu.cfs_quota_us")


def test_v1_cfs_quota_fraction(tmp_path: Path) -> None:
    root = v1_tree(
        tmp_path,
        {
            "/sys/fs/cgroup/cpu/x/cpu.cfs_quota_us": "50000",
            "/sys/fs/cgroup/cpu/x/cpu.cfs_period_us": "200000",
        },
    )
    assert read_cpu_quota(root) == (0.25, "/sys/fs/cgroup/cpu/x/cpu.cfs_quota_us")


def test_v1_memory_unlimited(tmp_path: Path) -> None:
    root = v1_tree(tmp_path, {"/sys/fs/cgroup/memory/x/memory.limit_in_bytes": V1_NO_LIMIT})
    assert read_memory_limit(root) == (None, None)


def test_v1_memory_limit(tmp_path: Path) -> None:
    root = v1_tree(tmp_path, {"/sys/fs/cgroup/memory/x/memory.limit_in_bytes": "536870912"})
    assert read_memory_limit(root) == (536870912, "/sys/fs/cgroup/memory/x/memory.limit_in_bytes")


def test_v1_cgroup_dirs_pick_the_controller_mount(tmp_path: Path) -> None:
    root = v1_tree(tmp_path, {})
    cpu_mount = root / "sys/fs/cgroup/cpu"
    memory_mount = root / "sys/fs/cgroup/memory"
    assert cgroup_dirs("cpu", root) == [CgroupDir(cpu_mount / "x", cpu_mount, 1)]
    assert cgroup_dirs("memory", root) == [CgroupDir(memory_mount / "x", memory_mount, 1)]


def test_v1_cpu_limit_is_not_read_from_the_memory_mount(tmp_path: Path) -> None:
    root = v1_tree(
        tmp_path,
        {
            "/sys/fs/cgroup/memory/x/cpu.cfs_quota_us": "100000",
            "/sys/fs/cgroup/memory/x/cpu.cfs_period_us": "100000",
        },
    )
    assert read_cpu_quota(root) == (None, None)


def test_v1_controller_without_a_mount(tmp_path: Path) -> None:
    root = make_tree(tmp_path, ["4:memory:/x", "1:cpu,cpuacct:/x"], [V1_MEMORY])
    assert cgroup_dirs("cpu", root) == []
    assert read_cpu_quota(root) == (None, None)


# --- nesting: limits on parents ------------------------------------------------------

NESTED = "/kubepods/pod1/ctr"


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        pytest.param(
            {"/sys/fs/cgroup/kubepods/pod1/cpu.max": "200000 100000"},
            (2.0, "/sys/fs/cgroup/kubepods/pod1/cpu.max"),
            id="parent-only",
        ),
        pytest.param(
            {
                "/sys/fs/cgroup/kubepods/pod1/ctr/cpu.max": "max 100000",
                "/sys/fs/cgroup/kubepods/cpu.max": "300000 100000",
            },
            (3.0, "/sys/fs/cgroup/kubepods/cpu.max"),
            id="grandparent-only",
        ),
        pytest.param(
            {
                "/sys/fs/cgroup/kubepods/pod1/ctr/cpu.max": "50000 100000",
                "/sys/fs/cgroup/kubepods/pod1/cpu.max": "200000 100000",
            },
            (0.5, "/sys/fs/cgroup/kubepods/pod1/ctr/cpu.max"),
            id="both-own-smaller",
        ),
        pytest.param(
            {
                "/sys/fs/cgroup/kubepods/pod1/ctr/cpu.max": "400000 100000",
                "/sys/fs/cgroup/kubepods/pod1/cpu.max": "150000 100000",
            },
            (1.5, "/sys/fs/cgroup/kubepods/pod1/cpu.max"),
            id="both-parent-smaller",
        ),
    ],
)
def test_v2_nested_cpu_quota(
    tmp_path: Path, files: dict[str, str], expected: tuple[float, str]
) -> None:
    root = v2_tree(tmp_path, files, cgroup=NESTED)
    assert read_cpu_quota(root) == expected


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        pytest.param(
            {"/sys/fs/cgroup/memory/kubepods/pod1/memory.limit_in_bytes": "1073741824"},
            (1073741824, "/sys/fs/cgroup/memory/kubepods/pod1/memory.limit_in_bytes"),
            id="parent-only",
        ),
        pytest.param(
            {
                "/sys/fs/cgroup/memory/kubepods/pod1/ctr/memory.limit_in_bytes": "268435456",
                "/sys/fs/cgroup/memory/kubepods/pod1/memory.limit_in_bytes": "1073741824",
                "/sys/fs/cgroup/memory/memory.limit_in_bytes": V1_NO_LIMIT,
            },
            (268435456, "/sys/fs/cgroup/memory/kubepods/pod1/ctr/memory.limit_in_bytes"),
            id="both-own-smaller",
        ),
        pytest.param(
            {
                "/sys/fs/cgroup/memory/kubepods/pod1/ctr/memory.limit_in_bytes": V1_NO_LIMIT,
                "/sys/fs/cgroup/memory/kubepods/pod1/memory.limit_in_bytes": "536870912",
                "/sys/fs/cgroup/memory/kubepods/memory.limit_in_bytes": "1073741824",
            },
            (536870912, "/sys/fs/cgroup/memory/kubepods/pod1/memory.limit_in_bytes"),
            id="both-parent-smaller",
        ),
    ],
)
def test_v1_nested_memory_limit(
    tmp_path: Path, files: dict[str, str], expected: tuple[int, str]
) -> None:
    root = v1_tree(tmp_path, files, cgroup=NESTED)
    assert read_memory_limit(root) == expected


def test_v2_nested_memory_limit_on_parent(tmp_path: Path) -> None:
    root = v2_tree(
        tmp_path,
        {
            "/sys/fs/cgroup/kubepods/pod1/ctr/memory.max": "max",
            "/sys/fs/cgroup/kubepods/pod1/memory.max": "536870912",
        },
        cgroup=NESTED,
    )
    assert read_memory_limit(root) == (536870912, "/sys/fs/cgroup/kubepods/pod1/memory.max")


def test_v1_nested_cpu_quota_on_parent(tmp_path: Path) -> None:
    root = v1_tree(
        tmp_path,
        {
            "/sys/fs/cgroup/cpu/kubepods/pod1/ctr/cpu.cfs_quota_us": "-1",
            "/sys/fs/cgroup/cpu/kubepods/pod1/ctr/cpu.cfs_period_us": "100000",
            "/sys/fs/cgroup/cpu/kubepods/pod1/cpu.cfs_quota_us": "250000",
            "/sys/fs/cgroup/cpu/kubepods/pod1/cpu.cfs_period_us": "100000",
        },
        cgroup=NESTED,
    )
    assert read_cpu_quota(root) == (2.5, "/sys/fs/cgroup/cpu/kubepods/pod1/cpu.cfs_quota_us")


def test_limits_above_the_mount_point_are_not_read(tmp_path: Path) -> None:
    root = v1_tree(tmp_path, {"/sys/fs/memory.limit_in_bytes": "1048576"}, cgroup=NESTED)
    assert read_memory_limit(root) == (None, None)


def test_up_to_mount_walks_to_the_mount_and_stops() -> None:
    mount = Path("/r/sys/fs/cgroup")
    group = CgroupDir(mount / "kubepods/pod1/ctr", mount, 2)
    assert list(group.up_to_mount()) == [
        mount / "kubepods/pod1/ctr",
        mount / "kubepods/pod1",
        mount / "kubepods",
        mount,
    ]
    assert list(CgroupDir(mount, mount, 2).up_to_mount()) == [mount]


# --- container-style mounts: the mount's root is the process's own cgroup -------------


def container_tree(root: Path, files: dict[str, str]) -> Path:
    return make_tree(
        root,
        ["4:memory:/docker/abc", "1:cpu,cpuacct:/docker/abc"],
        [
            "32 31 0:29 /docker/abc /sys/fs/cgroup/cpu ro,nosuid - cgroup cgroup rw,cpu,cpuacct",
            "35 31 0:32 /docker/abc /sys/fs/cgroup/memory ro,nosuid - cgroup cgroup rw,memory",
        ],
        files,
    )


def test_container_mount_root_maps_to_the_mount_point(tmp_path: Path) -> None:
    root = container_tree(tmp_path, {})
    mount = root / "sys/fs/cgroup/cpu"
    assert cgroup_dirs("cpu", root) == [CgroupDir(mount, mount, 1)]


def test_container_cpu_quota(tmp_path: Path) -> None:
    root = container_tree(
        tmp_path,
        {
            "/sys/fs/cgroup/cpu/cpu.cfs_quota_us": "200000",
            "/sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000",
        },
    )
    assert read_cpu_quota(root) == (2.0, "/sys/fs/cgroup/cpu/cpu.cfs_quota_us")


def test_container_memory_limit(tmp_path: Path) -> None:
    root = container_tree(tmp_path, {"/sys/fs/cgroup/memory/memory.limit_in_bytes": "536870912"})
    assert read_memory_limit(root) == (536870912, "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def test_container_nested_below_the_mount_root(tmp_path: Path) -> None:
    root = make_tree(
        tmp_path,
        ["0::/docker/abc/worker"],
        ["41 31 0:38 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw"],
        {"/sys/fs/cgroup/cpu.max": "100000 100000"},
    )
    mount = root / "sys/fs/cgroup"
    assert cgroup_dirs("cpu", root) == [CgroupDir(mount / "worker", mount, 2)]
    assert read_cpu_quota(root) == (1.0, "/sys/fs/cgroup/cpu.max")


def test_mount_root_that_only_shares_a_prefix_is_not_stripped(tmp_path: Path) -> None:
    root = make_tree(
        tmp_path,
        ["0::/docker/abcdef"],
        ["41 31 0:38 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw"],
    )
    mount = root / "sys/fs/cgroup"
    assert cgroup_dirs("cpu", root) == [CgroupDir(mount / "docker/abcdef", mount, 2)]


# --- hybrid hosts: v1 controllers and a v2 unified mount -----------------------------


def hybrid_tree(root: Path, files: dict[str, str]) -> Path:
    return make_tree(
        root,
        ["4:memory:/x", "1:cpu,cpuacct:/x", "0::/x"],
        [V1_CPU, V1_MEMORY, V2_UNIFIED],
        files,
    )


def test_hybrid_cgroup_dirs_has_both_versions(tmp_path: Path) -> None:
    root = hybrid_tree(tmp_path, {})
    cpu_mount = root / "sys/fs/cgroup/cpu"
    unified = root / "sys/fs/cgroup/unified"
    assert cgroup_dirs("cpu", root) == [
        CgroupDir(cpu_mount / "x", cpu_mount, 1),
        CgroupDir(unified / "x", unified, 2),
    ]


def test_hybrid_reads_the_v1_limit(tmp_path: Path) -> None:
    root = hybrid_tree(
        tmp_path,
        {
            "/sys/fs/cgroup/cpu/x/cpu.cfs_quota_us": "300000",
            "/sys/fs/cgroup/cpu/x/cpu.cfs_period_us": "100000",
            "/sys/fs/cgroup/memory/x/memory.limit_in_bytes": "268435456",
        },
    )
    assert read_cpu_quota(root) == (3.0, "/sys/fs/cgroup/cpu/x/cpu.cfs_quota_us")
    assert read_memory_limit(root) == (268435456, "/sys/fs/cgroup/memory/x/memory.limit_in_bytes")


def test_hybrid_reads_a_limit_set_in_v2(tmp_path: Path) -> None:
    root = hybrid_tree(tmp_path, {"/sys/fs/cgroup/unified/x/memory.max": "134217728"})
    assert read_memory_limit(root) == (134217728, "/sys/fs/cgroup/unified/x/memory.max")


def test_hybrid_smallest_of_both_versions_wins(tmp_path: Path) -> None:
    root = hybrid_tree(
        tmp_path,
        {
            "/sys/fs/cgroup/cpu/x/cpu.cfs_quota_us": "300000",
            "/sys/fs/cgroup/cpu/x/cpu.cfs_period_us": "100000",
            "/sys/fs/cgroup/unified/x/cpu.max": "150000 100000",
        },
    )
    assert read_cpu_quota(root) == (1.5, "/sys/fs/cgroup/unified/x/cpu.max")


# --- missing files ----------------------------------------------------------------------


def test_no_proc_files(tmp_path: Path) -> None:
    assert cgroup_dirs("cpu", tmp_path) == []
    assert read_cpu_quota(tmp_path) == (None, None)
    assert read_memory_limit(tmp_path) == (None, None)


def test_mounted_but_no_limit_files(tmp_path: Path) -> None:
    for tree in (v1_tree, v2_tree):
        root = tree(tmp_path / tree.__name__, {})
        assert read_cpu_quota(root) == (None, None)
        assert read_memory_limit(root) == (None, None)


def test_v1_quota_without_period_is_none(tmp_path: Path) -> None:
    root = v1_tree(tmp_path, {"/sys/fs/cgroup/cpu/x/cpu.cfs_quota_us": "100000"})
    assert read_cpu_quota(root) == (None, None)


# --- read_system_facts -----------------------------------------------------------------


def test_read_system_facts_from_a_fixture_root(tmp_path: Path) -> None:
    root = v2_tree(
        tmp_path,
        {
            "/sys/fs/cgroup/x/cpu.max": "150000 100000",
            "/sys/fs/cgroup/x/memory.max": "536870912",
        },
    )
    facts = read_system_facts(root)
    assert facts.cpu_quota == 1.5
    assert facts.cpu_quota_source == "/sys/fs/cgroup/x/cpu.max"
    assert facts.memory_limit == 536870912
    assert facts.memory_limit_source == "/sys/fs/cgroup/x/memory.max"
    assert facts.host_cpus >= 1
    assert facts.host_memory is not None and facts.host_memory > 0
    assert facts.affinity_cpus is None or 1 <= facts.affinity_cpus <= facts.host_cpus


def test_read_system_facts_without_limits(tmp_path: Path) -> None:
    facts = read_system_facts(v1_tree(tmp_path, {}))
    assert (facts.cpu_quota, facts.cpu_quota_source) == (None, None)
    assert (facts.memory_limit, facts.memory_limit_source) == (None, None)


def test_the_memory_measure_is_uss_where_linux_gives_it(tmp_path: Path) -> None:
    assert Path("/proc/self/smaps_rollup").exists()  # the development machines' kernels
    assert read_memory_measure() == "USS"
    assert read_system_facts(v1_tree(tmp_path, {})).memory_measure == "USS"


def test_with_app_memory_keeps_the_facts_and_says_how_it_was_measured(tmp_path: Path) -> None:
    facts = read_system_facts(v1_tree(tmp_path, {}))
    measured = with_app_memory(facts, 300 * 1024**2, "USS")
    assert measured.app_memory == 300 * 1024**2
    assert measured.app_memory_source == "own memory (USS) of a process that imported the app"
    assert (measured.host_cpus, measured.memory_limit) == (facts.host_cpus, facts.memory_limit)
