//! The accept loop: one listening socket, one front-end at a time, a fresh vhost-user daemon
//! (and so fresh ring state) per connection, until the target is stopped. The loop is the same
//! for every device type; a [`BackendFactory`] makes the backend of each connection.

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
use vhost_user_backend::{Error as DaemonError, VhostUserBackend, VhostUserDaemon, VringRwLock};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::blk_backend::BlkBackend;
use crate::blk_config::BlkTargetConfig;
use crate::blk_device::BlkDevice;
use crate::faults::{bump, Faults, StatCounters, Stats};
use crate::queue::{ConnectionSlot, Memory};
use crate::relay::Relay;
use crate::TargetError;

const LISTENER_TOKEN: u64 = 0;
const STOP_TOKEN: u64 = 1;

/// Makes the vhost-user backend of each front-end connection of a target.
pub(crate) trait BackendFactory: Send + 'static {
    /// The backend type.
    type Backend: VhostUserBackend<Bitmap = (), Vring = VringRwLock<Memory>> + 'static;

    /// A backend for the next connection, on the memory `mem` (empty until the front-end sends
    /// its memory table). Called before the connection is accepted: per-connection device state
    /// is reset here.
    fn create(&self, mem: Memory, connection: &Arc<ConnectionSlot>) -> Arc<Self::Backend>;

    /// Called once the daemon exists (its worker threads run), before the front-end is
    /// accepted: the place to register extra event sources with the workers.
    fn attach(
        &self,
        _backend: &Arc<Self::Backend>,
        _daemon: &VhostUserDaemon<Arc<Self::Backend>>,
    ) -> Result<(), String> {
        Ok(())
    }

    /// A front-end is connected (`true`) or has gone (`false`).
    fn connected(&self, _connected: bool) {}
}

/// State shared by the handle, its stoppers and the accept thread.
pub(crate) struct ServerShared {
    stop: AtomicBool,
    stop_event: EventNotifier,
    connection: Arc<ConnectionSlot>,
}

impl ServerShared {
    /// Asks the accept thread to end and drops the current connection, if any.
    fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Err(e) = self.stop_event.notify() {
            warn!("cannot wake the accept loop: {e}");
        }
        self.connection.shutdown();
    }
}

/// Stops a target from another thread (a signal handler thread, say) while the owner waits in
/// [`TargetHandle::wait`] (or [`ScsiTargetHandle::wait`](crate::ScsiTargetHandle::wait)).
#[derive(Clone)]
pub struct TargetStopper {
    shared: Arc<ServerShared>,
}

impl TargetStopper {
    /// Asks the target to stop; [`TargetHandle::wait`] returns once it has.
    pub fn stop(&self) {
        self.shared.request_stop();
    }
}

/// The accept thread of a running target, whatever its device type. Dropping it stops the
/// target.
pub(crate) struct Server {
    socket_path: PathBuf,
    shared: Arc<ServerShared>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Binds `socket_path` (a stale socket file there is replaced, anything else is refused) and
    /// starts the accept thread. `stats.connections` counts the accepted front-ends.
    pub(crate) fn spawn<F: BackendFactory>(
        socket_path: &Path,
        name: &str,
        stats: Arc<StatCounters>,
        factory: F,
    ) -> Result<Self, TargetError> {
        // A stale socket from an earlier run is replaced; anything else at the path is kept.
        match std::fs::symlink_metadata(socket_path) {
            // A socket someone still listens on belongs to a running server: keep it.
            Ok(meta)
                if meta.file_type().is_socket() && UnixStream::connect(socket_path).is_ok() =>
            {
                return Err(TargetError::SocketInUse {
                    path: socket_path.to_path_buf(),
                })
            }
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
        // A front-end gets the target's memory and data: the owner only, whatever the umask.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(socket_path, std::fs::Permissions::from_mode(0o600)).map_err(
                |source| TargetError::Listen {
                    path: socket_path.to_path_buf(),
                    source: vhost::vhost_user::Error::SocketError(source),
                },
            )?;
        }
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

        let shared = Arc::new(ServerShared {
            stop: AtomicBool::new(false),
            stop_event,
            connection: Arc::new(ConnectionSlot::default()),
        });
        let accept = AcceptLoop {
            listener,
            epoll,
            _stop_consumer: stop_consumer,
            shared: Arc::clone(&shared),
            stats,
            factory,
            name: format!("vireo-{name}:{}", socket_path.display()),
        };
        let thread = thread::Builder::new()
            .name(format!("vireo-{name}-accept"))
            .spawn(move || accept.run())
            .map_err(TargetError::SpawnThread)?;
        Ok(Server {
            socket_path: socket_path.to_path_buf(),
            shared,
            thread: Some(thread),
        })
    }

    pub(crate) fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    pub(crate) fn running(&self) -> bool {
        self.thread.is_some()
    }

    pub(crate) fn stopper(&self) -> TargetStopper {
        TargetStopper {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Drops the current front-end connection, if any; the target accepts the next one.
    pub(crate) fn drop_connection(&self) -> bool {
        self.shared.connection.shutdown()
    }

    /// Blocks until the target is stopped through a [`TargetStopper`].
    pub(crate) fn wait(&mut self) {
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                error!("the target's accept thread panicked");
            }
        }
    }

    /// Drops the connected front-end if any, stops accepting, removes the socket and joins every
    /// thread. Does not hang whether or not a front-end is connected.
    pub(crate) fn stop_and_join(&mut self) {
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

impl Drop for Server {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// A running vhost-user-blk target. Dropping it stops the target, like [`TargetHandle::stop`].
pub struct TargetHandle {
    server: Server,
    faults: Arc<Faults>,
    stats: Arc<StatCounters>,
    device: Arc<BlkDevice>,
}

impl std::fmt::Debug for TargetHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetHandle")
            .field("socket_path", &self.server.socket_path())
            .field("running", &self.server.running())
            .finish()
    }
}

impl TargetHandle {
    /// The vhost-user socket front-ends connect to.
    pub fn socket_path(&self) -> &Path {
        self.server.socket_path()
    }

    /// The fault switches; settable while front-ends run I/O.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// The fault switches, to hand to another thread.
    pub fn faults_shared(&self) -> Arc<Faults> {
        Arc::clone(&self.faults)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        self.stats.snapshot()
    }

    /// The configuration the target runs with.
    pub fn config(&self) -> &BlkTargetConfig {
        self.device.config()
    }

    /// Disk size in 512-byte sectors (as in the config space).
    pub fn capacity_sectors(&self) -> u64 {
        self.device.capacity_sectors()
    }

    /// A handle that can stop the target from elsewhere.
    pub fn stopper(&self) -> TargetStopper {
        self.server.stopper()
    }

    /// Blocks until the target is stopped through a [`TargetStopper`] (for a standalone
    /// target process).
    pub fn wait(mut self) {
        self.server.wait();
    }

    /// Stops the target: drops the connected front-end if any, stops accepting, removes the
    /// socket and joins every thread. Does not hang whether or not a front-end is connected.
    pub fn stop(mut self) {
        self.server.stop_and_join();
    }
}

/// Makes a [`BlkBackend`] per connection, all on the same disk.
struct BlkFactory {
    device: Arc<BlkDevice>,
    faults: Arc<Faults>,
}

impl BackendFactory for BlkFactory {
    type Backend = BlkBackend;

    fn create(&self, mem: Memory, connection: &Arc<ConnectionSlot>) -> Arc<BlkBackend> {
        Arc::new(BlkBackend::new(
            Arc::clone(&self.device),
            Arc::clone(&self.faults),
            Arc::clone(connection),
            mem,
        ))
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
    let faults = Arc::new(Faults::default());
    let server = Server::spawn(
        socket_path,
        "blk",
        Arc::clone(&stats),
        BlkFactory {
            device: Arc::clone(&device),
            faults: Arc::clone(&faults),
        },
    )?;
    info!(
        "vhost-user-blk target on {} ({} sectors)",
        socket_path.display(),
        device.capacity_sectors()
    );
    Ok(TargetHandle {
        server,
        faults,
        stats,
        device,
    })
}

/// A fresh path for the socket between the relay and the daemon.
fn private_socket_path() -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("vireo-target-{}-{n}.sock", std::process::id()))
}

struct AcceptLoop<F> {
    listener: Listener,
    epoll: Epoll,
    _stop_consumer: EventConsumer,
    shared: Arc<ServerShared>,
    stats: Arc<StatCounters>,
    factory: F,
    name: String,
}

impl<F: BackendFactory> AcceptLoop<F> {
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
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::<()>::new());
        let backend = self.factory.create(mem.clone(), &self.shared.connection);
        let mut daemon = VhostUserDaemon::new(self.name.clone(), Arc::clone(&backend), mem)
            .map_err(|e| format!("cannot create the vhost-user daemon: {e}"))?;
        self.factory.attach(&backend, &daemon)?;
        let Some(front) = self
            .listener
            .accept()
            .map_err(|e| format!("cannot accept a front-end: {e}"))?
        else {
            return Ok(());
        };
        // The daemon is served through a relay (see relay.rs) on a private socket pair:
        // bind, connect, and the daemon accepts the connection already queued.
        let private_path = private_socket_path();
        let mut private = Listener::new(&private_path, true)
            .map_err(|e| format!("cannot bind {}: {e}", private_path.display()))?;
        let back = UnixStream::connect(&private_path)
            .map_err(|e| format!("cannot connect {}: {e}", private_path.display()))?;
        daemon
            .start(&mut private)
            .map_err(|e| format!("cannot hand the front-end to the daemon: {e}"))?;
        drop(private);
        let _ = std::fs::remove_file(&private_path);
        let relay = Relay::spawn(front, back, self.shared.connection.clone())
            .map_err(|e| format!("cannot start the vhost-user relay: {e}"))?;
        bump(&self.stats.connections);
        info!("{}: front-end connected", self.name);
        self.factory.connected(true);

        let connection = &self.shared.connection;
        connection.set(daemon.shutdown_handle());
        if self.stopping() {
            connection.shutdown();
        }
        let result = daemon.wait();
        connection.set(None);
        self.factory.connected(false);
        // Dropping the daemon ends and joins the queue threads and closes its end of the
        // relay, which then closes the front-end's.
        drop(daemon);
        relay.join();
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
