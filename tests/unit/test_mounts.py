"""mounts: which mount holds a path, from proc(5)'s mountinfo text, and whether its locks hold
across nodes (Lustre `localflock` grants them per node, silently)."""

from __future__ import annotations

from bakery_slurm.mounts import mount_of, parse_mountinfo

# A login node's mounts: Lustre project storage mounted `localflock`, a home on NFS, and a
# second Lustre mount (with `flock`) inside the first, whose point holds a space.
MOUNTINFO = """\
22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
30 22 0:40 / /cluster rw,relatime shared:10 - lustre 10.1.1.1@o2ib:/fs rw,localflock,lazystatfs
31 30 0:41 / /cluster/work/shared\\040space rw,relatime - lustre 10.1.1.2@o2ib:/w rw,flock
32 22 0:42 / /home rw,relatime shared:12 master:3 - nfs4 nas:/home rw,vers=4.2
"""


def test_the_deepest_mount_above_a_path_holds_it():
    mounts = parse_mountinfo(MOUNTINFO)
    assert [(m.point, m.fstype) for m in mounts] == [
        ("/", "ext4"), ("/cluster", "lustre"), ("/cluster/work/shared space", "lustre"),
        ("/home", "nfs4")]
    assert mount_of("/cluster/projects/nn1k/work", mounts).point == "/cluster"
    assert mount_of("/cluster/work/shared space/cells", mounts).point == "/cluster/work/shared space"
    assert mount_of("/clusterfoo", mounts).point == "/"  # a prefix of the name is no parent
    assert mount_of("/home/me", mounts).fstype == "nfs4"


def test_superblock_and_mount_options_both_count():
    [_, lustre, inner, home] = parse_mountinfo(MOUNTINFO)
    assert "localflock" in lustre.options and "relatime" in lustre.options
    assert "flock" in inner.options and "localflock" not in inner.options
    assert "vers=4.2" in home.options


def test_a_later_mount_over_the_same_point_hides_the_earlier():
    text = MOUNTINFO + "40 30 0:50 / /cluster rw - lustre 10.1.1.9@o2ib:/fs2 rw,flock\n"
    assert "localflock" not in mount_of("/cluster/x", parse_mountinfo(text)).options


def test_lines_that_are_not_mounts_are_ignored():
    assert parse_mountinfo("garbage\n\n22 1 0:21 / / rw - ext4\n") == []
