//! A real container runtime for the deployment tests: containerd driven through CRI, as a
//! kubelet drives it, with real CNI plugins. [`Containerd`] runs a runtime of the test's
//! own, [`Cri`] is a blocking CRI client, and [`kubelet`] runs Kubernetes pod specs (those
//! of `deploy/` among them) the way the kubelet does.

mod containerd;
pub mod kubelet;
mod runtime_node;

use std::{path::Path, time::Duration};

use k8s_cri::v1::{
    image_service_client::ImageServiceClient, runtime_service_client::RuntimeServiceClient, *,
};
use tonic::transport::{Channel, Endpoint, Uri};

pub use containerd::{Containerd, PAUSE_IMAGE};
pub use runtime_node::{RuntimeNode, APP_IMAGE};

/// A blocking CRI client over the runtime's Unix socket.
pub struct Cri {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    #[allow(dead_code, reason = "kept for image operations tests may need")]
    images: ImageServiceClient<Channel>,
}

/// A CRI call's failure, as text (the runtime's own message).
pub type CriResult<T> = Result<T, String>;

impl Cri {
    pub fn connect(socket: &Path) -> CriResult<Cri> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let path = socket.to_path_buf();
        let channel = rt
            .block_on(
                Endpoint::try_from("http://[::]")
                    .map_err(|e| e.to_string())?
                    .connect_timeout(Duration::from_secs(5))
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            let s = tokio::net::UnixStream::connect(path).await?;
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                        }
                    })),
            )
            .map_err(|e| format!("connect to {}: {e}", socket.display()))?;
        Ok(Cri {
            rt,
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        })
    }

    fn call<T>(
        &self,
        f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> CriResult<T> {
        self.rt
            .block_on(f)
            .map(tonic::Response::into_inner)
            .map_err(|s| s.message().to_string())
    }

    pub fn version(&self) -> CriResult<VersionResponse> {
        let mut c = self.runtime.clone();
        self.call(c.version(VersionRequest::default()))
    }

    /// RunPodSandbox: the runtime creates the pod's namespaces and runs the CNI ADD chain.
    pub fn run_pod(&self, config: PodSandboxConfig) -> CriResult<String> {
        let mut c = self.runtime.clone();
        self.call(c.run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: String::new(),
        }))
        .map(|r| r.pod_sandbox_id)
    }

    pub fn pod_status(&self, id: &str) -> CriResult<PodSandboxStatus> {
        let mut c = self.runtime.clone();
        self.call(c.pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: false,
        }))?
        .status
        .ok_or_else(|| "no status".into())
    }

    /// StopPodSandbox (CNI DEL, containers stopped), then RemovePodSandbox (CNI DEL again).
    pub fn stop_pod(&self, id: &str) -> CriResult<()> {
        let mut c = self.runtime.clone();
        self.call(c.stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: id.into(),
        }))
        .map(|_| ())
    }

    pub fn remove_pod(&self, id: &str) -> CriResult<()> {
        let mut c = self.runtime.clone();
        self.call(c.remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: id.into(),
        }))
        .map(|_| ())
    }

    pub fn list_pods(&self) -> CriResult<Vec<PodSandbox>> {
        let mut c = self.runtime.clone();
        self.call(c.list_pod_sandbox(ListPodSandboxRequest { filter: None }))
            .map(|r| r.items)
    }

    /// Every pod, stopped and removed (teardown; errors are the runtime's to report).
    pub fn remove_all_pods(&self) {
        for p in self.list_pods().unwrap_or_default() {
            let _ = self.stop_pod(&p.id);
            let _ = self.remove_pod(&p.id);
        }
    }

    pub fn create_container(
        &self,
        pod: &str,
        config: ContainerConfig,
        sandbox: &PodSandboxConfig,
    ) -> CriResult<String> {
        let mut c = self.runtime.clone();
        self.call(c.create_container(CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(config),
            sandbox_config: Some(sandbox.clone()),
        }))
        .map(|r| r.container_id)
    }

    pub fn remove_container(&self, id: &str) -> CriResult<()> {
        let mut c = self.runtime.clone();
        self.call(c.remove_container(RemoveContainerRequest {
            container_id: id.into(),
        }))
        .map(|_| ())
    }

    pub fn start_container(&self, id: &str) -> CriResult<()> {
        let mut c = self.runtime.clone();
        self.call(c.start_container(StartContainerRequest {
            container_id: id.into(),
        }))
        .map(|_| ())
    }

    pub fn stop_container(&self, id: &str, timeout: i64) -> CriResult<()> {
        let mut c = self.runtime.clone();
        self.call(c.stop_container(StopContainerRequest {
            container_id: id.into(),
            timeout,
        }))
        .map(|_| ())
    }

    pub fn container_status(&self, id: &str) -> CriResult<ContainerStatus> {
        let mut c = self.runtime.clone();
        self.call(c.container_status(ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        }))?
        .status
        .ok_or_else(|| "no status".into())
    }

    /// Runs `cmd` in a running container and returns (exit code, stdout, stderr).
    pub fn exec(
        &self,
        id: &str,
        cmd: &[&str],
        timeout: Duration,
    ) -> CriResult<(i32, String, String)> {
        let mut c = self.runtime.clone();
        self.call(c.exec_sync(ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: timeout.as_secs() as i64,
        }))
        .map(|r| {
            (
                r.exit_code,
                String::from_utf8_lossy(&r.stdout).into_owned(),
                String::from_utf8_lossy(&r.stderr).into_owned(),
            )
        })
    }
}
