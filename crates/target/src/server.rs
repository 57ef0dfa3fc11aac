//! The accept loop: one listening socket, one front-end at a time, a fresh vhost-user daemon
//! (and so fresh ring state) per connection, until the target is stopped.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{Error as DaemonError, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::blk_backend::{BlkBackend, ConnectionSlot};
use crate::blk_config::BlkTargetConfig;
use crate::blk_device::BlkDevice;
use crate::faults::{bump, Faults, StatCounters, Stats};
use crate::TargetError;

const LISTENER_TOKEN: u64 = 0;
const STOP_TOKEN: u64 = 1;

/// State shared by the handle, its stoppers and the accept thread.
struct Shared {
    stop: AtomicBool,
    stop_event: EventNotifier,
    connection: Arc<ConnectionSlot>,
    faults: Arc<Faults>,
    stats: Arc<StatCounters>,
    device: Arc<BlkDevice>,
}

impl Shared {
    /// Asks the accept thread to end and drops the current connection, if any.
    fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Err(e) = self.stop_event.notify() {
            warn!("cannot wake the accept loop: {e}");
        }
        self.connection.shutdown();
    }
}

/// A running target. Dropping it stops the target, like [`TargetHandle::stop`].
pub struct TargetHandle {
    socket_path: PathBuf,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Stops a target from another thread (a signal handler thread, say) while the owner waits in
/// [`TargetHandle::wait`].
#[derive(Clone)]
pub struct TargetStopper {
    shared: Arc<Shared>,
}

impl TargetStopper {
    /// Asks the target to stop; [`TargetHandle::wait`] returns once it has.
    pub fn stop(&self) {
        self.shared.request_stop();
    }
}

impl std::fmt::Debug for TargetHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetHandle")
            .field("socket_path", &self.socket_path)
            .field("running", &self.thread.is_some())
            .finish()
    }
}

impl TargetHandle {
    /// The vhost-user socket front-ends connect to.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// The fault switches; settable while front-ends run I/O.
    pub fn faults(&self) -> &Faults {
        &self.shared.faults
    }

    /// The fault switches, to hand to another thread.
    pub fn faults_shared(&self) -> Arc<Faults> {
        Arc::clone(&self.shared.faults)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        self.shared.stats.snapshot()
    }

    /// The configuration the target runs with.
    pub fn config(&self) -> &BlkTargetConfig {
        self.shared.device.config()
    }

    /// Disk size in 512-byte sectors (as in the config space).
    pub fn capacity_sectors(&self) -> u64 {
        self.shared.device.capacity_sectors()
    }

    /// A handle that can stop the target from elsewhere.
    pub fn stopper(&self) -> TargetStopper {
        TargetStopper {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Blocks until the target is stopped through a [`TargetStopper`] (for a standalone
    /// target process).
    pub fn wait(mut self) {
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                error!("the target's accept thread panicked");
            }
        }
    }

    /// Stops the target: drops the connected front-end if any, stops accepting, removes the
    /// socket and joins every thread. Does not hang whether or not a front-end is connected.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.shared.request_stop();
        // The accept thread wakes on the stop event. If it is stuck inside accept() (a
        // connection that vanished between the readiness report and the accept), a connection
        // of our own unblocks it.
        let start = Instant::now();
        let mut poked = false;
        while !thread.is_finished() {
            if !poked && start.elapsed() > Duration::from_millis(200) {
                poked = true;
                debug!("poking the accept loop of {}", self.socket_path.display());
                let _ = UnixStream::connect(&self.socket_path);
                self.shared.request_stop();
            }
            thread::sleep(Duration::from_millis(2));
        }
        if thread.join().is_err() {
            error!("the target's accept thread panicked");
        }
    }
}

impl Drop for TargetHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Starts a vhost-user-blk target listening on `socket_path` (an existing socket file there is
/// replaced). The socket accepts connections as soon as this returns; front-ends are served one
/// at a time, each new one after the previous disconnected, until the target is stopped.
pub fn spawn_blk_target(
    socket_path: &Path,
    cfg: BlkTargetConfig,
) -> Result<TargetHandle, TargetError> {
    let stats = Arc::new(StatCounters::default());
    let device = Arc::new(BlkDevice::new(cfg, Arc::clone(&stats))?);
    // A stale socket from an earlier run is replaced; anything else at the path is kept.
    match std::fs::symlink_metadata(socket_path) {
        Ok(meta) if meta.file_type().is_socket() => {
            let _ = std::fs::remove_file(socket_path);
        }
        Ok(_) => {
            return Err(TargetError::SocketPathTaken {
                path: socket_path.to_path_buf(),
            })
        }
        Err(_) => {}
    }
    let listener = Listener::new(socket_path, false).map_err(|source| TargetError::Listen {
        path: socket_path.to_path_buf(),
        source,
    })?;
    let (stop_consumer, stop_event) =
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)
            .map_err(TargetError::Poll)?;
    let epoll = Epoll::new().map_err(TargetError::Poll)?;
    epoll
        .ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
        )
        .map_err(TargetError::Poll)?;
    epoll
        .ctl(
            ControlOperation::Add,
            stop_consumer.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )
        .map_err(TargetError::Poll)?;

    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        stop_event,
        connection: Arc::new(ConnectionSlot::default()),
        faults: Arc::new(Faults::default()),
        stats,
        device,
    });
    let accept = AcceptLoop {
        listener,
        epoll,
        _stop_consumer: stop_consumer,
        shared: Arc::clone(&shared),
        name: format!("vireo-blk:{}", socket_path.display()),
    };
    let thread = thread::Builder::new()
        .name("vireo-blk-accept".into())
        .spawn(move || accept.run())
        .map_err(TargetError::SpawnThread)?;
    info!(
        "vhost-user-blk target on {} ({} sectors)",
        socket_path.display(),
        shared.device.capacity_sectors()
    );
    Ok(TargetHandle {
        socket_path: socket_path.to_path_buf(),
        shared,
        thread: Some(thread),
    })
}

struct AcceptLoop {
    listener: Listener,
    epoll: Epoll,
    _stop_consumer: EventConsumer,
    shared: Arc<Shared>,
    name: String,
}

impl AcceptLoop {
    fn stopping(&self) -> bool {
        self.shared.stop.load(Ordering::SeqCst)
    }

    /// Waits until a front-end knocks (true) or the target is stopped (false).
    fn wait_for_connection(&self) -> bool {
        let mut events = [EpollEvent::default(); 2];
        loop {
            if self.stopping() {
                return false;
            }
            match self.epoll.wait(-1, &mut events) {
                Ok(n) => {
                    if self.stopping() {
                        return false;
                    }
                    if events[..n].iter().any(|e| e.data() == LISTENER_TOKEN) {
                        return true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    error!("{}: accept loop cannot wait: {e}", self.name);
                    return false;
                }
            }
        }
    }

    fn run(mut self) {
        while self.wait_for_connection() {
            if let Err(e) = self.serve_one() {
                warn!("{}: {e}", self.name);
                // Do not spin if the failure repeats.
                thread::sleep(Duration::from_millis(10));
            }
        }
        debug!("{}: accept loop ends", self.name);
        // Dropping the listener removes the socket file.
    }

    /// Accepts one front-end and serves it until it disconnects or the target stops.
    fn serve_one(&mut self) -> Result<(), String> {
        let shared = &self.shared;
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::<()>::new());
        let backend = Arc::new(BlkBackend::new(
            Arc::clone(&shared.device),
            Arc::clone(&shared.faults),
            Arc::clone(&shared.connection),
            mem.clone(),
        ));
        let mut daemon = VhostUserDaemon::new(self.name.clone(), backend, mem)
            .map_err(|e| format!("cannot create the vhost-user daemon: {e}"))?;
        daemon
            .start(&mut self.listener)
            .map_err(|e| format!("cannot accept a front-end: {e}"))?;
        bump(&shared.stats.connections);
        info!("{}: front-end connected", self.name);

        shared.connection.set(daemon.shutdown_handle());
        if self.stopping() {
            shared.connection.shutdown();
        }
        let result = daemon.wait();
        shared.connection.set(None);
        // Dropping the daemon ends and joins the queue threads.
        drop(daemon);
        match result {
            Ok(())
            | Err(DaemonError::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => {
                info!("{}: front-end disconnected", self.name);
                Ok(())
            }
            Err(e) => Err(format!("front-end connection ended: {e}")),
        }
    }
}
