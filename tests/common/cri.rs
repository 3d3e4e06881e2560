//! A CRI client of the suite's own, speaking `runtime.v1` to containerd the
//! way kubelet does: typed calls on one connection, with kubelet's request
//! shapes (the pod's sandbox config passed to pull and create, ExecSync
//! for probes and `kubectl exec`-style commands, stop with a grace period
//! before remove). Compiled from CRI's api.proto in Debian's
//! golang-github-kubernetes-cri-api-dev (see proto/README.md); only the
//! tests include it.

use std::path::Path;
use std::time::Duration;

use tonic::transport::Channel;

#[allow(clippy::all, dead_code)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/runtime.v1.rs"));
}

use v1::image_service_client::ImageServiceClient;
use v1::runtime_service_client::RuntimeServiceClient;

/// kubelet's default for `--runtime-request-timeout`.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

pub struct Cri {
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

/// What ExecSync returned.
#[derive(Debug)]
pub struct Exec {
    pub stdout: String,
    pub stderr: String,
    pub exit_code: i32,
}

/// A failed CRI call, with what it was, for the test's message.
fn fail<T>(what: &str, r: Result<tonic::Response<T>, tonic::Status>) -> T {
    match r {
        Ok(response) => response.into_inner(),
        Err(status) => panic!(
            "CRI {what} failed: {:?}: {}",
            status.code(),
            status.message()
        ),
    }
}

impl Cri {
    /// Connects to CRI on containerd's socket, and checks what kubelet
    /// checks first: the runtime answers Version with CRI v1.
    pub async fn connect(socket: &Path) -> Cri {
        let channel = ontop_tools::client::connect(socket)
            .await
            .unwrap_or_else(|e| panic!("connecting to CRI at {}: {e:#}", socket.display()));
        let mut cri = Cri {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        };
        let version = fail(
            "Version",
            cri.runtime
                .version(v1::VersionRequest {
                    version: "v1".into(),
                })
                .await,
        );
        assert_eq!(version.runtime_api_version, "v1", "{version:?}");
        cri
    }

    fn spec(image: &str) -> Option<v1::ImageSpec> {
        Some(v1::ImageSpec {
            image: image.to_string(),
            user_specified_image: image.to_string(),
            ..Default::default()
        })
    }

    /// Pulls `image` for `pod`, as kubelet's image manager does; returns
    /// the image's reference (its id).
    pub async fn pull(&mut self, image: &str, pod: &v1::PodSandboxConfig) -> String {
        let mut request = tonic::Request::new(v1::PullImageRequest {
            image: Self::spec(image),
            auth: None,
            sandbox_config: Some(pod.clone()),
        });
        request.set_timeout(REQUEST_TIMEOUT);
        fail("PullImage", self.images.pull_image(request).await).image_ref
    }

    /// ImageStatus of `image`: None when CRI does not have it.
    pub async fn image_status(&mut self, image: &str) -> Option<v1::Image> {
        let request = v1::ImageStatusRequest {
            image: Self::spec(image),
            verbose: false,
        };
        fail("ImageStatus", self.images.image_status(request).await).image
    }

    /// The image filesystems CRI reports (kubelet's imagefs).
    pub async fn image_fs_info(&mut self) -> Vec<v1::FilesystemUsage> {
        fail(
            "ImageFsInfo",
            self.images.image_fs_info(v1::ImageFsInfoRequest {}).await,
        )
        .image_filesystems
    }

    pub async fn list_images(&mut self) -> Vec<v1::Image> {
        fail(
            "ListImages",
            self.images
                .list_images(v1::ListImagesRequest { filter: None })
                .await,
        )
        .images
    }

    pub async fn remove_image(&mut self, image: &str) {
        let request = v1::RemoveImageRequest {
            image: Self::spec(image),
        };
        fail("RemoveImage", self.images.remove_image(request).await);
    }

    /// Runs a pod sandbox; returns its id.
    pub async fn run_pod(&mut self, config: &v1::PodSandboxConfig) -> String {
        let mut request = tonic::Request::new(v1::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        });
        request.set_timeout(REQUEST_TIMEOUT);
        fail("RunPodSandbox", self.runtime.run_pod_sandbox(request).await).pod_sandbox_id
    }

    /// Creates a container in `pod` (kubelet passes the pod's config too);
    /// returns its id.
    pub async fn create(
        &mut self,
        pod: &str,
        config: v1::ContainerConfig,
        pod_config: &v1::PodSandboxConfig,
    ) -> String {
        let request = v1::CreateContainerRequest {
            pod_sandbox_id: pod.to_string(),
            config: Some(config),
            sandbox_config: Some(pod_config.clone()),
        };
        fail(
            "CreateContainer",
            self.runtime.create_container(request).await,
        )
        .container_id
    }

    pub async fn start(&mut self, container: &str) {
        let request = v1::StartContainerRequest {
            container_id: container.to_string(),
        };
        fail(
            "StartContainer",
            self.runtime.start_container(request).await,
        );
    }

    /// ExecSync of `sh -c SCRIPT` in `container`, with a timeout, as
    /// kubelet's exec probes run.
    pub async fn exec(&mut self, container: &str, script: &str) -> Exec {
        let request = v1::ExecSyncRequest {
            container_id: container.to_string(),
            cmd: vec!["sh".into(), "-c".into(), script.into()],
            timeout: 60,
        };
        let r = fail("ExecSync", self.runtime.exec_sync(request).await);
        Exec {
            stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
            exit_code: r.exit_code,
        }
    }

    pub async fn stats(&mut self, container: &str) -> v1::ContainerStats {
        let request = v1::ContainerStatsRequest {
            container_id: container.to_string(),
        };
        fail(
            "ContainerStats",
            self.runtime.container_stats(request).await,
        )
        .stats
        .expect("ContainerStats answered without stats")
    }

    /// Stops `container` with a grace period, then removes it.
    pub async fn stop_and_remove(&mut self, container: &str) {
        let id = container.to_string();
        let stop = v1::StopContainerRequest {
            container_id: id.clone(),
            timeout: 2,
        };
        fail("StopContainer", self.runtime.stop_container(stop).await);
        let remove = v1::RemoveContainerRequest { container_id: id };
        fail(
            "RemoveContainer",
            self.runtime.remove_container(remove).await,
        );
    }

    pub async fn stop_and_remove_pod(&mut self, pod: &str) {
        let id = pod.to_string();
        let stop = v1::StopPodSandboxRequest {
            pod_sandbox_id: id.clone(),
        };
        fail("StopPodSandbox", self.runtime.stop_pod_sandbox(stop).await);
        let remove = v1::RemovePodSandboxRequest { pod_sandbox_id: id };
        fail(
            "RemovePodSandbox",
            self.runtime.remove_pod_sandbox(remove).await,
        );
    }

    pub async fn pods(&mut self) -> Vec<v1::PodSandbox> {
        fail(
            "ListPodSandbox",
            self.runtime
                .list_pod_sandbox(v1::ListPodSandboxRequest { filter: None })
                .await,
        )
        .items
    }

    pub async fn containers(&mut self) -> Vec<v1::Container> {
        fail(
            "ListContainers",
            self.runtime
                .list_containers(v1::ListContainersRequest { filter: None })
                .await,
        )
        .containers
    }
}

/// A host-network pod's config (no CNI here), logging under `logs`.
pub fn host_network_pod(name: &str, logs: &Path) -> v1::PodSandboxConfig {
    v1::PodSandboxConfig {
        metadata: Some(v1::PodSandboxMetadata {
            name: name.to_string(),
            uid: format!("{name}-uid"),
            namespace: "default".into(),
            attempt: 0,
        }),
        log_directory: logs.display().to_string(),
        linux: Some(v1::LinuxPodSandboxConfig {
            security_context: Some(v1::LinuxSandboxSecurityContext {
                namespace_options: Some(v1::NamespaceOption {
                    network: v1::NamespaceMode::Node as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A container of `image` that sleeps, its rootfs read-only if asked.
pub fn sleeper(name: &str, image: &str, readonly_rootfs: bool) -> v1::ContainerConfig {
    v1::ContainerConfig {
        metadata: Some(v1::ContainerMetadata {
            name: name.to_string(),
            attempt: 0,
        }),
        image: Cri::spec(image),
        command: vec!["/bin/sleep".into(), "2147483647".into()],
        log_path: format!("{name}.log"),
        linux: Some(v1::LinuxContainerConfig {
            security_context: Some(v1::LinuxContainerSecurityContext {
                readonly_rootfs,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}
