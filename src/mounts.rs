//! Pure mount building: from a snapshot's kind and layer dirs to the mount
//! specs containerd performs. Nothing here touches the filesystem.

use std::path::{Path, PathBuf};

use crate::backend::{self, Backend};
use crate::idmap::IdMapping;
use crate::snapshot::Kind;

/// One mount for containerd to perform, in containerd's `Mount` shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub fstype: String,
    pub source: String,
    pub options: Vec<String>,
}

/// Overlay options decided once at start-up from the backend, the kernel
/// and config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OverlayOptions {
    pub backend: Backend,
    /// `index=off`: set when the kernel has the overlay `index` parameter,
    /// so that a lower dir reused in another overlay does not fail with
    /// ESTALE, as containerd's overlay snapshotter does.
    pub index_off: bool,
    /// `userxattr`: needed when mounting inside a user namespace, where the
    /// kernel refuses `trusted.*` xattrs.
    pub userxattr: bool,
    /// Extra options from config, for layered mounts only.
    pub extra: Vec<String>,
    /// Whether containerd's applier can write a layer straight into an
    /// upper dir (see [`Layers::unpack`]): not inside a user namespace,
    /// where it cannot make overlay's whiteout devices and mounts instead.
    pub direct_unpack: bool,
}

impl OverlayOptions {
    /// Reads what the backend, the running kernel and process need.
    /// `index=off` and `userxattr` are kernel overlay options that
    /// fuse-overlayfs does not take.
    pub fn detect(backend: Backend, extra: Vec<String>) -> OverlayOptions {
        let kernel = backend == Backend::Overlayfs;
        OverlayOptions {
            backend,
            index_off: kernel && Path::new("/sys/module/overlay/parameters/index").exists(),
            userxattr: kernel && backend::in_user_namespace(),
            extra,
            direct_unpack: !backend::in_user_namespace(),
        }
    }
}

/// The directories one snapshot is made of.
#[derive(Debug, Clone)]
pub struct Layers {
    pub kind: Kind,
    /// The snapshot's own tree (upper dir).
    pub upper: PathBuf,
    pub work: PathBuf,
    /// The parents' trees, nearest first.
    pub parents: Vec<PathBuf>,
    /// A host base directory under all of them (its link under the root).
    pub base: Option<PathBuf>,
    /// Overlay's `volatile` for writable mounts: no syncs, throwaway data.
    pub volatile: bool,
    /// User-namespace id mappings ontop applies: fuse-overlayfs maps
    /// them itself; on the kernel backend they become options for
    /// containerd 2.x to idmap-mount the lower layers.
    pub idmap: IdMapping,
    /// A layer being unpacked by containerd's applier (the Prepare of an
    /// image layer). With no parent it gets an overlay mount holding only
    /// `upperdir=`: the applier then writes into the upper dir itself and
    /// turns the layer's whiteouts into overlay's, where a bind mount would
    /// lose them (containerd issue 13030). Nobody mounts it; containerd
    /// 2.2+ unpacks layers in parallel this way, each without its parent.
    pub unpack: bool,
    /// An empty directory, the lower layer of a mapped snapshot that has
    /// nothing under it.
    pub empty: PathBuf,
}

/// The mounts for an active snapshot or a view, following containerd's
/// overlay snapshotter shape for shape.
pub fn build(layers: &Layers, opts: &OverlayOptions) -> Vec<Mount> {
    let readonly = layers.kind == Kind::View;
    // fuse-overlayfs maps ids only on its own mounts: a bind would show
    // the container the ids stored on disk, and store its writes with
    // host ids. A mapped snapshot is always layered.
    let fuse_mapped = opts.backend == Backend::FuseOverlayfs && !layers.idmap.is_empty();
    // The kernel's mappings are containerd's to perform, on any shape: it
    // idmap-mounts a bind, and an overlay's lower dirs.
    let kernel_map = match opts.backend {
        Backend::Overlayfs if !layers.idmap.is_empty() => layers.idmap.kernel_options(),
        _ => Vec::new(),
    };
    // The base is the bottom layer: a snapshot with nothing but a base is
    // still an overlay of its upper over the base, never a bind of the
    // base itself, which must not be written.
    let mut lowers: Vec<&Path> = layers
        .parents
        .iter()
        .chain(&layers.base)
        .map(PathBuf::as_path)
        .collect();
    if lowers.is_empty() {
        if layers.unpack && !readonly && opts.direct_unpack {
            return vec![Mount {
                fstype: "overlay".into(),
                source: "overlay".into(),
                options: vec![format!("upperdir={}", layers.upper.display())],
            }];
        }
        if !fuse_mapped {
            // Overlay needs at least one lower dir, and a lone tree needs
            // no overlay anyway: bind it.
            return vec![bind(kernel_map, &layers.upper, readonly, true)];
        }
        // A view's own tree is empty and read-only: it can be the lower.
        lowers.push(if readonly {
            &layers.upper
        } else {
            &layers.empty
        });
    }
    if readonly && lowers.len() == 1 && !fuse_mapped {
        // A view of one layer is that layer, read-only. A host base is
        // bound without `rbind`: a read-only remount does not reach the
        // submounts an rbind would bring along, and they must not be
        // writable through the view.
        let recursive = layers.base.is_none();
        return vec![bind(kernel_map, lowers[0], true, recursive)];
    }
    let mut options = kernel_map;
    if opts.index_off {
        options.push("index=off".to_string());
    }
    if opts.userxattr {
        options.push("userxattr".to_string());
    }
    if !readonly {
        options.push(format!("workdir={}", layers.work.display()));
        options.push(format!("upperdir={}", layers.upper.display()));
    }
    // Without an upperdir the mount is read-only, which is what a
    // multi-layer view needs.
    let lowers: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
    options.push(format!("lowerdir={}", lowers.join(":")));
    if layers.volatile && !readonly {
        options.push("volatile".to_string());
    }
    if opts.backend == Backend::FuseOverlayfs {
        options.extend(layers.idmap.fuse_options());
    }
    options.extend(opts.extra.iter().cloned());
    vec![Mount {
        fstype: opts.backend.mount_type().into(),
        source: "overlay".into(),
        options,
    }]
}

/// A bind mount of `path`, after `first` options (containerd's idmap).
fn bind(first: Vec<String>, path: &Path, readonly: bool, recursive: bool) -> Mount {
    let mut options = first;
    options.push(if readonly { "ro" } else { "rw" }.into());
    options.push(if recursive { "rbind" } else { "bind" }.into());
    Mount {
        fstype: "bind".into(),
        source: path.display().to_string(),
        options,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layers(kind: Kind, parents: &[&str]) -> Layers {
        Layers {
            kind,
            upper: "/r/snapshots/9/fs".into(),
            work: "/r/snapshots/9/work".into(),
            parents: parents.iter().map(PathBuf::from).collect(),
            base: None,
            volatile: false,
            idmap: IdMapping::default(),
            empty: "/r/empty".into(),
            unpack: false,
        }
    }

    fn on_base(mut l: Layers) -> Layers {
        l.base = Some("/r/snapshots/9/base".into());
        l
    }

    fn opts(index_off: bool, userxattr: bool, extra: &[&str]) -> OverlayOptions {
        OverlayOptions {
            backend: Backend::Overlayfs,
            index_off,
            userxattr,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            direct_unpack: true,
        }
    }

    fn mount(fstype: &str, source: &str, options: &[&str]) -> Mount {
        Mount {
            fstype: fstype.into(),
            source: source.into(),
            options: options.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn mount_shapes_match_containerds_overlay_snapshotter() {
        let o = opts(true, false, &["metacopy=off"]);
        let cases = [
            (
                layers(Kind::Active, &[]),
                mount("bind", "/r/snapshots/9/fs", &["rw", "rbind"]),
            ),
            (
                layers(Kind::View, &[]),
                mount("bind", "/r/snapshots/9/fs", &["ro", "rbind"]),
            ),
            (
                layers(Kind::View, &["/r/snapshots/1/fs"]),
                mount("bind", "/r/snapshots/1/fs", &["ro", "rbind"]),
            ),
            (
                layers(Kind::Active, &["/r/snapshots/2/fs", "/r/snapshots/1/fs"]),
                mount(
                    "overlay",
                    "overlay",
                    &[
                        "index=off",
                        "workdir=/r/snapshots/9/work",
                        "upperdir=/r/snapshots/9/fs",
                        "lowerdir=/r/snapshots/2/fs:/r/snapshots/1/fs",
                        "metacopy=off",
                    ],
                ),
            ),
            (
                layers(Kind::View, &["/r/snapshots/2/fs", "/r/snapshots/1/fs"]),
                mount(
                    "overlay",
                    "overlay",
                    &[
                        "index=off",
                        "lowerdir=/r/snapshots/2/fs:/r/snapshots/1/fs",
                        "metacopy=off",
                    ],
                ),
            ),
        ];
        for (l, want) in cases {
            assert_eq!(build(&l, &o), vec![want], "{l:?}");
        }
    }

    #[test]
    fn a_base_is_the_bottom_layer_and_never_bound_writable() {
        let o = opts(true, false, &[]);
        let cases = [
            (
                on_base(layers(Kind::Active, &[])),
                mount(
                    "overlay",
                    "overlay",
                    &[
                        "index=off",
                        "workdir=/r/snapshots/9/work",
                        "upperdir=/r/snapshots/9/fs",
                        "lowerdir=/r/snapshots/9/base",
                    ],
                ),
            ),
            (
                on_base(layers(
                    Kind::Active,
                    &["/r/snapshots/2/fs", "/r/snapshots/1/fs"],
                )),
                mount(
                    "overlay",
                    "overlay",
                    &[
                        "index=off",
                        "workdir=/r/snapshots/9/work",
                        "upperdir=/r/snapshots/9/fs",
                        "lowerdir=/r/snapshots/2/fs:/r/snapshots/1/fs:/r/snapshots/9/base",
                    ],
                ),
            ),
            (
                on_base(layers(Kind::View, &[])),
                mount("bind", "/r/snapshots/9/base", &["ro", "bind"]),
            ),
            (
                on_base(layers(Kind::View, &["/r/snapshots/1/fs"])),
                mount(
                    "overlay",
                    "overlay",
                    &[
                        "index=off",
                        "lowerdir=/r/snapshots/1/fs:/r/snapshots/9/base",
                    ],
                ),
            ),
        ];
        for (l, want) in cases {
            assert_eq!(build(&l, &o), vec![want], "{l:?}");
        }
    }

    #[test]
    fn volatile_applies_to_writable_overlays_only() {
        let o = opts(false, false, &["metacopy=off"]);
        let mut l = on_base(layers(Kind::Active, &[]));
        l.volatile = true;
        assert_eq!(
            build(&l, &o)[0].options,
            [
                "workdir=/r/snapshots/9/work",
                "upperdir=/r/snapshots/9/fs",
                "lowerdir=/r/snapshots/9/base",
                "volatile",
                "metacopy=off"
            ]
        );
        l.kind = Kind::View;
        l.parents = vec!["/p".into()];
        assert!(!build(&l, &o)[0].options.contains(&"volatile".to_string()));
        let mut plain = layers(Kind::Active, &[]);
        plain.volatile = true;
        assert_eq!(build(&plain, &o)[0].options, ["rw", "rbind"]);
    }

    #[test]
    fn userxattr_follows_index_and_extra_options_skip_binds() {
        let o = opts(false, true, &["volatile"]);
        let m = build(&layers(Kind::Active, &["/l"]), &o);
        assert_eq!(
            m[0].options,
            [
                "userxattr",
                "workdir=/r/snapshots/9/work",
                "upperdir=/r/snapshots/9/fs",
                "lowerdir=/l",
                "volatile"
            ]
        );
        let m = build(&layers(Kind::Active, &[]), &o);
        assert_eq!(m[0].options, ["rw", "rbind"]);
    }

    fn fuse(extra: &[&str]) -> OverlayOptions {
        OverlayOptions {
            backend: Backend::FuseOverlayfs,
            ..opts(false, false, extra)
        }
    }

    fn mapped(mut l: Layers) -> Layers {
        l.idmap = IdMapping {
            uids: vec![crate::idmap::Range {
                container: 0,
                host: 100000,
                size: 65536,
            }],
            gids: vec![],
        };
        l
    }

    #[test]
    fn fuse_mounts_have_the_same_shapes_with_the_fuse_type() {
        let o = fuse(&["metacopy=off"]);
        let fuse_mount = |options: &[&str]| mount("fuse3.fuse-overlayfs", "overlay", options);
        let cases = [
            (
                layers(Kind::Active, &[]),
                mount("bind", "/r/snapshots/9/fs", &["rw", "rbind"]),
            ),
            (
                layers(Kind::View, &["/r/snapshots/1/fs"]),
                mount("bind", "/r/snapshots/1/fs", &["ro", "rbind"]),
            ),
            (
                layers(Kind::Active, &["/r/snapshots/2/fs", "/r/snapshots/1/fs"]),
                fuse_mount(&[
                    "workdir=/r/snapshots/9/work",
                    "upperdir=/r/snapshots/9/fs",
                    "lowerdir=/r/snapshots/2/fs:/r/snapshots/1/fs",
                    "metacopy=off",
                ]),
            ),
            (
                layers(Kind::View, &["/r/snapshots/2/fs", "/r/snapshots/1/fs"]),
                fuse_mount(&[
                    "lowerdir=/r/snapshots/2/fs:/r/snapshots/1/fs",
                    "metacopy=off",
                ]),
            ),
            (
                on_base(layers(Kind::Active, &[])),
                fuse_mount(&[
                    "workdir=/r/snapshots/9/work",
                    "upperdir=/r/snapshots/9/fs",
                    "lowerdir=/r/snapshots/9/base",
                    "metacopy=off",
                ]),
            ),
        ];
        for (l, want) in cases {
            assert_eq!(build(&l, &o), vec![want], "{l:?}");
        }
    }

    #[test]
    fn a_mapped_snapshot_is_always_a_fuse_mount_with_its_mapping() {
        let o = fuse(&[]);
        let fuse_mount = |options: &[&str]| mount("fuse3.fuse-overlayfs", "overlay", options);
        let cases = [
            (
                mapped(layers(Kind::Active, &[])),
                fuse_mount(&[
                    "workdir=/r/snapshots/9/work",
                    "upperdir=/r/snapshots/9/fs",
                    "lowerdir=/r/empty",
                    "uidmapping=0:100000:65536",
                ]),
            ),
            (
                mapped(layers(Kind::View, &[])),
                fuse_mount(&["lowerdir=/r/snapshots/9/fs", "uidmapping=0:100000:65536"]),
            ),
            (
                mapped(layers(Kind::View, &["/r/snapshots/1/fs"])),
                fuse_mount(&["lowerdir=/r/snapshots/1/fs", "uidmapping=0:100000:65536"]),
            ),
            (
                mapped(layers(Kind::Active, &["/r/snapshots/1/fs"])),
                fuse_mount(&[
                    "workdir=/r/snapshots/9/work",
                    "upperdir=/r/snapshots/9/fs",
                    "lowerdir=/r/snapshots/1/fs",
                    "uidmapping=0:100000:65536",
                ]),
            ),
        ];
        for (l, want) in cases {
            assert_eq!(build(&l, &o), vec![want], "{l:?}");
        }
    }

    fn mapped_both(mut l: Layers) -> Layers {
        l = mapped(l);
        l.idmap.gids = vec![crate::idmap::Range {
            container: 0,
            host: 200000,
            size: 65536,
        }];
        l
    }

    #[test]
    fn kernel_mappings_are_containerds_uidmap_options_on_its_overlay_shapes() {
        let o = opts(true, false, &[]);
        let map = ["uidmap=0:100000:65536", "gidmap=0:200000:65536"];
        let with_map = |rest: &[&str]| -> Vec<String> {
            map.iter().chain(rest).map(|s| s.to_string()).collect()
        };
        let cases = [
            (
                mapped_both(layers(Kind::Active, &[])),
                Mount {
                    fstype: "bind".into(),
                    source: "/r/snapshots/9/fs".into(),
                    options: with_map(&["rw", "rbind"]),
                },
            ),
            (
                mapped_both(layers(Kind::View, &["/r/snapshots/1/fs"])),
                Mount {
                    fstype: "bind".into(),
                    source: "/r/snapshots/1/fs".into(),
                    options: with_map(&["ro", "rbind"]),
                },
            ),
            (
                mapped_both(layers(
                    Kind::Active,
                    &["/r/snapshots/2/fs", "/r/snapshots/1/fs"],
                )),
                Mount {
                    fstype: "overlay".into(),
                    source: "overlay".into(),
                    options: with_map(&[
                        "index=off",
                        "workdir=/r/snapshots/9/work",
                        "upperdir=/r/snapshots/9/fs",
                        "lowerdir=/r/snapshots/2/fs:/r/snapshots/1/fs",
                    ]),
                },
            ),
        ];
        for (l, want) in cases {
            assert_eq!(build(&l, &o), vec![want], "{l:?}");
        }
    }

    #[test]
    fn a_parentless_layer_unpack_is_an_overlay_with_only_an_upperdir() {
        let mut l = layers(Kind::Active, &[]);
        l.unpack = true;
        let upper_only = mount("overlay", "overlay", &["upperdir=/r/snapshots/9/fs"]);
        for o in [opts(true, false, &["metacopy=off"]), fuse(&[])] {
            assert_eq!(build(&l, &o), vec![upper_only.clone()], "{o:?}");
        }
        // In a user namespace the applier mounts instead: keep the bind.
        let userns = OverlayOptions {
            direct_unpack: false,
            ..opts(true, true, &[])
        };
        assert_eq!(build(&l, &userns)[0].fstype, "bind");
        // A layer unpacked on its parent is an ordinary overlay.
        l.parents = vec!["/r/snapshots/1/fs".into()];
        assert!(build(&l, &opts(false, false, &[]))[0]
            .options
            .iter()
            .any(|o| o.starts_with("lowerdir=")));
    }
}
