//! Group commit: concurrent Admin API writes share one transaction and one fsync, while each
//! keeps its own version and its own result.
//!
//! The writer task takes the first waiting operation, then everything else already queued (up
//! to `max_batch`), and applies them with [`Store::write_batch`]. While one batch commits, the
//! next one queues up, so the batch size grows with the load and a lone writer pays no delay.
//! The clients a batch answered get a chance to join the next one (a few yields, no timer).

use tokio::sync::{mpsc, oneshot};

use crate::cp::store::{Op, Outcome, Store, StoreError};

type Job = (Op, oneshot::Sender<Result<Outcome, StoreError>>);

/// A handle to the writer task. Cheap to clone.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Job>,
}

impl Writer {
    /// Starts the writer task; it ends when every handle is dropped.
    pub fn spawn(store: Store, max_batch: usize) -> Writer {
        let (tx, rx) = mpsc::channel::<Job>(max_batch * 4);
        tokio::spawn(run(store, rx, max_batch));
        Writer { tx }
    }

    pub async fn write(&self, op: Op) -> Result<Outcome, StoreError> {
        let (reply_tx, reply_rx) = oneshot::channel();
        self.tx
            .send((op, reply_tx))
            .await
            .map_err(|_| StoreError::Unavailable("the writer has stopped".into()))?;
        reply_rx
            .await
            .map_err(|_| StoreError::CommitUnknown("the writer stopped during the write".into()))?
    }
}

async fn run(store: Store, mut rx: mpsc::Receiver<Job>, max_batch: usize) {
    let mut batch: Vec<Job> = Vec::with_capacity(max_batch);
    // How many writes the last batch carried: the clients it answered are likely about to
    // send their next ones.
    let mut expected = 1;
    while rx.recv_many(&mut batch, max_batch).await > 0 {
        // Those clients were woken by the answers and are queued to run: yield so they can
        // join this batch rather than wait a whole transaction for the next one. No timer: a
        // lone writer (expected 1) never waits, and the wait ends at the first yield that
        // brings nothing new.
        while batch.len() < expected.min(max_batch) {
            tokio::task::yield_now().await;
            let before = batch.len();
            while batch.len() < max_batch {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            if batch.len() == before {
                break;
            }
        }
        expected = batch.len();
        let (ops, replies): (Vec<Op>, Vec<_>) = batch.drain(..).unzip();
        let results = store.write_batch(ops).await;
        for (reply, result) in replies.into_iter().zip(results) {
            // The client may have gone away; its write stands.
            let _ = reply.send(result);
        }
    }
}
