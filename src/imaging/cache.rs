//! Pictures made before, kept in memory: a study list shows the same
//! thumbnails on every visit, and a viewer asks for the same rendered frame
//! again. A picture is keyed by its object key (which holds the object's
//! digest: a replaced instance has another key, so nothing stale is served),
//! the frame and how it was made. Pictures carry no patient identifiers, so
//! one made for one caller may be shown to any other who may see the
//! instance; who may is decided before the cache is asked.

use bytes::Bytes;
use quick_cache::sync::{Cache, DefaultLifecycle, PlaceholderGuard};
use quick_cache::{DefaultHashBuilder, OptionsBuilder, Weighter};

use super::render::Spec;
use crate::telemetry;

/// Bytes of pictures kept at most.
const CAPACITY: u64 = 64 << 20;
/// About how many (thumbnails are a few KiB, rendered frames ~100 KiB).
const ESTIMATED_ITEMS: usize = 4096;
/// The cache is split into this many parts, each holding its share of
/// CAPACITY; a picture larger than about one share is not kept. Few parts
/// (not one per core, the crate's default) so that a full-size rendered
/// radiograph of several MiB is kept on a machine of many cores too.
const SHARDS: usize = 4;

#[derive(Clone)]
struct ByLength;

impl Weighter<String, Bytes> for ByLength {
    fn weight(&self, key: &String, picture: &Bytes) -> u64 {
        (key.len() + picture.len()) as u64
    }
}

type PictureCache = Cache<String, Bytes, ByLength>;

/// The pictures cache.
pub struct Pictures(PictureCache);

/// A picture to make, which requests for the same one are waiting for.
pub struct Making<'a>(
    PlaceholderGuard<
        'a,
        String,
        Bytes,
        ByLength,
        DefaultHashBuilder,
        DefaultLifecycle<String, Bytes>,
    >,
);

impl Making<'_> {
    /// Keep the picture made (and hand it to the waiting requests).
    pub fn keep(self, picture: Bytes) {
        let _ = self.0.insert(picture);
    }
}

impl Default for Pictures {
    fn default() -> Self {
        let options = OptionsBuilder::new()
            .estimated_items_capacity(ESTIMATED_ITEMS)
            .weight_capacity(CAPACITY)
            .shards(SHARDS)
            .build()
            .expect("static cache options are valid");
        Self(Cache::with_options(
            options,
            ByLength,
            DefaultHashBuilder::default(),
            DefaultLifecycle::default(),
        ))
    }
}

impl Pictures {
    /// Where frame `frame` of the object at `object_key`, made as `spec`
    /// says, is kept.
    pub fn key(object_key: &str, frame: u32, spec: &Spec) -> String {
        format!("{object_key}#{frame}#{spec:?}")
    }

    /// A kept picture, uncounted and without waiting (for tests; requests
    /// go through `get_or_make`).
    #[cfg(test)]
    fn get(&self, key: &str) -> Option<Bytes> {
        self.0.get(key)
    }

    /// The picture kept at `key`, or the duty to make it: while one request
    /// makes a picture, others asking for the same one wait for it instead of
    /// each making it (a study list after a restart asks for every thumbnail
    /// at once). If the maker gives up, the next waiter makes it.
    pub async fn get_or_make(&self, key: &str) -> Result<Bytes, Making<'_>> {
        let found = self.0.get_value_or_guard_async(key).await.map_err(Making);
        let outcome = if found.is_ok() { "hit" } else { "miss" };
        metrics::counter!(telemetry::PICTURE_CACHE, "outcome" => outcome).increment(1);
        found
    }

    #[cfg(test)]
    fn insert(&self, key: String, picture: Bytes) {
        self.0.insert(key, picture);
    }

    /// Pictures held.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imaging::render::Format;

    fn spec(viewport: (u32, u32)) -> Spec {
        Spec {
            format: Format::Jpeg { quality: 90 },
            viewport: Some(viewport),
            region: None,
            window: None,
            shrink_only: true,
        }
    }

    #[test]
    fn another_object_frame_or_spec_is_another_picture() {
        let pictures = Pictures::default();
        let key = Pictures::key("instances/H/1/2/3.0123456789abcdef.dcm", 1, &spec((64, 64)));
        pictures.insert(key.clone(), Bytes::from_static(b"jpeg"));
        assert_eq!(pictures.get(&key).as_deref(), Some(&b"jpeg"[..]));
        for other in [
            Pictures::key("instances/H/1/2/3.fedcba9876543210.dcm", 1, &spec((64, 64))),
            Pictures::key("instances/H/1/2/3.0123456789abcdef.dcm", 2, &spec((64, 64))),
            Pictures::key(
                "instances/H/1/2/3.0123456789abcdef.dcm",
                1,
                &spec((128, 128)),
            ),
        ] {
            assert_ne!(other, key);
            assert!(pictures.get(&other).is_none());
        }
    }

    #[tokio::test]
    async fn a_picture_being_made_is_waited_for() {
        let pictures = std::sync::Arc::new(Pictures::default());
        let making = match pictures.get_or_make("p").await {
            Err(making) => making,
            Ok(_) => panic!("nothing is kept yet"),
        };
        // On this one-thread runtime the waiter runs from its signal on to
        // its wait before this task runs again.
        let (asking, asked) = tokio::sync::oneshot::channel();
        let waiter = {
            let pictures = pictures.clone();
            tokio::spawn(async move {
                let _ = asking.send(());
                pictures.get_or_make("p").await.ok()
            })
        };
        asked.await.unwrap();
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "the second request waits");
        making.keep(Bytes::from_static(b"png"));
        assert_eq!(waiter.await.unwrap().as_deref(), Some(&b"png"[..]));
    }

    #[test]
    fn it_holds_a_bounded_number_of_bytes() {
        let pictures = Pictures::default();
        // A full-size rendered radiograph is kept, whatever the machine.
        let radiograph = Bytes::from(vec![1u8; 4 << 20]);
        pictures.insert("cr".into(), radiograph.clone());
        assert_eq!(pictures.get("cr"), Some(radiograph));
        let big = Bytes::from(vec![0u8; 1 << 20]);
        for n in 0..200 {
            pictures.insert(format!("k{n}"), big.clone());
        }
        assert!(pictures.0.weight() <= CAPACITY, "{}", pictures.0.weight());
        assert!(
            pictures.len() > 16 && pictures.len() < 200,
            "{}",
            pictures.len()
        );
    }
}
